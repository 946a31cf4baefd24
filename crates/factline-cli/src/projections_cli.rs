//! `factline projections …`: what operators do with the read models of a
//! store — list them and their lag, rebuild one blue/green, pause and
//! resume, and handle parked events.
//!
//! Listing, pausing, resuming, listing parked events and skipping work on
//! any projection in the read-model database; rebuilding and retrying run
//! a projection's code, so they work on the projections the binary knows:
//! the orders read models and those declared in `--read-models FILE`.

use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use factline::{EventStore, Location};
use factline_projections::{
    BatchPolicy, Parking, Partition, PoisonPolicy, Portable, PostgresSink, Progress,
    ProjectionInfo, ProjectionStatus, RetryReport, Runner, SqliteSink, VersionedSink,
};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::catalog::{self, Catalog, ReadModelDb, Sinks, READ_SCHEMA};
use crate::usage;

#[derive(Args, Debug)]
pub struct ProjectionsArgs {
    /// The PostgreSQL schema of the read models (SQLite keeps them in the
    /// events' file).
    #[arg(long, global = true, default_value = READ_SCHEMA)]
    schema: String,

    /// A definitions file of read models (TOML; see docs/read-models.md)
    /// that rebuild, retry and discard run; without it they know the
    /// orders demo's.
    #[arg(long, global = true, env = "FACTLINE_READ_MODELS", value_name = "FILE")]
    read_models: Option<std::path::PathBuf>,

    /// The database of the read models (a SQLite file or a postgres://
    /// URL) when it is not the events' own.
    #[arg(
        long,
        global = true,
        env = "FACTLINE_READ_MODELS_DB",
        value_name = "DB"
    )]
    read_models_db: Option<String>,

    #[command(subcommand)]
    command: ProjectionsCommand,
}

#[derive(Subcommand, Debug)]
pub enum ProjectionsCommand {
    /// Every projection of the read-model database: version, checkpoint,
    /// events behind, state, parked events.
    List {
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One projection's state and lag, as JSON.
    Status {
        /// The projection's name (`factline projections list` shows them).
        name: String,
    },
    /// Build the next version beside the active one from the whole
    /// history, catch up to the head, and swap it in atomically; the
    /// active version serves reads until the swap. A stopped rebuild is
    /// resumed by running this again.
    Rebuild(RebuildArgs),
    /// Stop applying events (in every process running the projection)
    /// until resumed; reads keep working.
    Pause {
        /// The projection's name (`factline projections list` shows them).
        name: String,
    },
    /// Apply events again after a pause.
    Resume {
        /// The projection's name (`factline projections list` shows them).
        name: String,
    },
    /// The parked (dead-letter) events of a projection, as JSON lines.
    Parked {
        /// The projection's name (`factline projections list` shows them).
        name: String,
    },
    /// Apply the parked events again, in order; a stream stops at its
    /// first event that still fails.
    Retry {
        /// The projection's name (`factline projections list` shows them).
        name: String,
    },
    /// Give up on one parked event (it is counted as skipped).
    Skip {
        /// The projection's name.
        name: String,
        /// The parked event's global position.
        position: u64,
    },
    /// Drop a rebuild that was stopped before its swap (`--no-swap`, a
    /// crash, Ctrl-C); the active version is untouched.
    Discard {
        /// The projection's name (`factline projections list` shows them).
        name: String,
    },
}

#[derive(Args, Debug, Default)]
pub struct RebuildArgs {
    /// The projection to rebuild (one the binary has the code of).
    pub name: String,
    /// Apply at most this many events per second (the rebuild shares the
    /// database with live traffic).
    #[arg(long)]
    pub rate: Option<u64>,
    /// Print how the new version differs from the active one (rows added,
    /// removed, changed, with samples) before swapping.
    #[arg(long)]
    pub diff: bool,
    /// Rows of each kind shown per table by --diff.
    #[arg(long, default_value_t = 5)]
    pub samples: usize,
    /// Stop before the swap, leaving the new version for review; run the
    /// rebuild again to swap it in, or discard it.
    #[arg(long)]
    pub no_swap: bool,
    /// Keep the old version's tables after the swap.
    #[arg(long)]
    pub keep_old: bool,
    /// Build the new version as this many partitions run side by side
    /// (default: as many as the active version).
    #[arg(long)]
    pub partitions: Option<u32>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// What `status` and `list` say a projection is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReportState {
    /// Its active version serves reads.
    Active,
    /// An operator paused it.
    Paused,
    /// A new version is being built beside the active one.
    Rebuilding,
}

impl std::fmt::Display for ReportState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The table pads this column, so it goes through `pad`.
        f.pad(match self {
            ReportState::Active => "active",
            ReportState::Paused => "paused",
            ReportState::Rebuilding => "rebuilding",
        })
    }
}

/// A projection's state as `status` and `list --json` print it.
#[derive(Serialize)]
pub struct StatusReport {
    pub name: String,
    pub active_version: Option<u32>,
    pub checkpoint: u64,
    pub head: u64,
    pub events_behind: u64,
    pub seconds_behind: f64,
    pub state: ReportState,
    pub parked: u64,
    pub skipped: u64,
    pub versions: Vec<factline_projections::VersionInfo>,
}

/// The last line of `rebuild`, a contract for scripts.
#[derive(Serialize)]
pub struct RebuildReport {
    pub projection: String,
    pub version: u32,
    pub previous_version: Option<u32>,
    pub partitions: u32,
    /// Events this run applied (a resumed rebuild counts only its own).
    pub events: u64,
    pub checkpoint: u64,
    pub swapped: bool,
    pub kept_old: bool,
    pub seconds: f64,
}

pub async fn run(args: ProjectionsArgs, location: &Location) -> anyhow::Result<()> {
    // Without a file, the commands know the demo's read models.
    let besides = match args.read_models {
        None => crate::demo::declared_read_models()?,
        Some(_) => Default::default(),
    };
    let catalog = Catalog::load(args.read_models.as_deref(), besides)?;
    let db = match &args.read_models_db {
        Some(other) => ReadModelDb::for_location(
            &Location::parse(other).map_err(|e| usage(format!("--read-models-db: {e}")))?,
            &args.schema,
        )?,
        None => ReadModelDb::for_location(location, &args.schema)?,
    };
    let mut admin = db.admin().await?;
    match args.command {
        ProjectionsCommand::List { json } => {
            let store = location.open().await?;
            let mut reports = Vec::new();
            for info in admin.projections().await? {
                reports.push(status_of(&store, info).await?);
            }
            if json {
                println!("{}", serde_json::to_string(&reports)?);
            } else {
                print_table(&reports);
            }
        }
        ProjectionsCommand::Status { name } => {
            let store = location.open().await?;
            let info = existing(&admin, &name).await?;
            println!(
                "{}",
                serde_json::to_string(&status_of(&store, info).await?)?
            );
        }
        ProjectionsCommand::Pause { name } => {
            existing(&admin, &name).await?;
            admin.set_paused(&name, true).await?;
            println!(
                "{}",
                serde_json::json!({ "projection": name, "state": "paused" })
            );
        }
        ProjectionsCommand::Resume { name } => {
            existing(&admin, &name).await?;
            admin.set_paused(&name, false).await?;
            println!(
                "{}",
                serde_json::json!({ "projection": name, "state": "running" })
            );
        }
        ProjectionsCommand::Parked { name } => {
            existing(&admin, &name).await?;
            for parked in admin.parked(&name).await? {
                println!("{}", serde_json::to_string(&parked)?);
            }
        }
        ProjectionsCommand::Skip { name, position } => {
            existing(&admin, &name).await?;
            if !admin.skip(&name, position).await? {
                return Err(usage(format!(
                    "projection {name} has no parked event at position {position}"
                )));
            }
            println!(
                "{}",
                serde_json::json!({ "projection": name, "skipped": position })
            );
        }
        ProjectionsCommand::Retry { name } => {
            let store = location.open().await?;
            let report = retry(&catalog, &db, &store, &name).await?;
            println!(
                "{}",
                serde_json::json!({
                    "projection": name,
                    "applied": report.applied,
                    "still_parked": report.still_parked,
                })
            );
        }
        ProjectionsCommand::Discard { name } => {
            let projection = catalog.find(&name)?;
            let info = existing(&admin, &name).await?;
            let Some(version) = candidate_in_progress(&info) else {
                return Err(usage(format!(
                    "projection {name} has no rebuild in progress to discard"
                )));
            };
            let projection = Portable::new(projection).at_version(version);
            match &db {
                ReadModelDb::Sqlite(path) => {
                    SqliteSink::open_rebuild(path, projection)?
                        .discard()
                        .await?
                }
                ReadModelDb::Postgres { url, schema } => {
                    PostgresSink::connect_rebuild(url, schema, projection)
                        .await?
                        .discard()
                        .await?
                }
            }
            println!(
                "{}",
                serde_json::json!({ "projection": name, "discarded_version": version })
            );
        }
        ProjectionsCommand::Rebuild(rebuild_args) => {
            let store = location.open().await?;
            let report = rebuild(&catalog, &db, &admin, store, &rebuild_args, |_, _| {}).await?;
            println!("{}", serde_json::to_string(&report)?);
        }
    }
    Ok(())
}

/// Applies the parked events of a known projection again, in order.
pub async fn retry(
    catalog: &Catalog,
    db: &ReadModelDb,
    store: &Arc<dyn EventStore>,
    name: &str,
) -> anyhow::Result<RetryReport> {
    let projection = catalog.find(name)?;
    let info = existing(&db.admin().await?, name).await?;
    let version = info.active_version.unwrap_or(projection.version());
    let projection = Portable::new(projection).at_version(version);
    Ok(match db {
        ReadModelDb::Sqlite(path) => {
            SqliteSink::open(path, projection)?
                .retry(store.as_ref())
                .await?
        }
        ReadModelDb::Postgres { url, schema } => {
            PostgresSink::connect(url, schema, projection)
                .await?
                .retry(store.as_ref())
                .await?
        }
    })
}

/// The projection's entry, or a usage error when the database has none.
async fn existing(admin: &catalog::Admin, name: &str) -> anyhow::Result<ProjectionInfo> {
    admin.info(name).await?.ok_or_else(|| {
        usage(format!(
            "the read-model database has no projection {name:?} (`factline projections list` shows which it has)"
        ))
    })
}

/// A version above the active one with a checkpoint: a rebuild that was
/// stopped before its swap.
pub fn candidate_in_progress(info: &ProjectionInfo) -> Option<u32> {
    let active = info.active_version.unwrap_or(0);
    info.versions
        .iter()
        .map(|v| v.version)
        .filter(|v| *v > active)
        .max()
}

async fn status_of(
    store: &Arc<dyn EventStore>,
    info: ProjectionInfo,
) -> anyhow::Result<StatusReport> {
    let head = store.head_position().await?;
    status_at(store, info, head).await
}

/// The projection's state and lag behind `head`.
pub async fn status_at(
    store: &Arc<dyn EventStore>,
    info: ProjectionInfo,
    head: u64,
) -> anyhow::Result<StatusReport> {
    let behind = head.saturating_sub(info.checkpoint);
    let seconds_behind = match (behind, info.checkpoint) {
        (0, _) | (_, 0) => 0.0,
        (_, at) => store.read_all(at, 1).await?.first().map_or(0.0, |e| {
            ((chrono::Utc::now() - e.recorded_at).num_milliseconds() as f64 / 1e3).max(0.0)
        }),
    };
    let state = if info.paused {
        ReportState::Paused
    } else if candidate_in_progress(&info).is_some() {
        ReportState::Rebuilding
    } else {
        ReportState::Active
    };
    Ok(StatusReport {
        name: info.name,
        active_version: info.active_version,
        checkpoint: info.checkpoint,
        head,
        events_behind: behind,
        seconds_behind,
        state,
        parked: info.parked,
        skipped: info.skipped,
        versions: info.versions,
    })
}

fn print_table(reports: &[StatusReport]) {
    if reports.is_empty() {
        println!("no projections are registered in this store");
        return;
    }
    println!(
        "{:<20} {:>7} {:>12} {:>10} {:>10}  {:<10} {:>7}",
        "NAME", "VERSION", "CHECKPOINT", "BEHIND", "SECONDS", "STATE", "PARKED"
    );
    for r in reports {
        let version = r
            .active_version
            .map_or_else(|| "-".to_owned(), |v| v.to_string());
        println!(
            "{:<20} {:>7} {:>12} {:>10} {:>10.1}  {:<10} {:>7}",
            r.name, version, r.checkpoint, r.events_behind, r.seconds_behind, r.state, r.parked
        );
    }
}

/// Builds the next version of a known projection beside the active one
/// and swaps it in (or resumes a stopped rebuild). `on_start` gets the
/// version and the runners' statuses, which show the progress.
pub async fn rebuild(
    catalog: &Catalog,
    db: &ReadModelDb,
    admin: &catalog::Admin,
    store: Arc<dyn EventStore>,
    args: &RebuildArgs,
    on_start: impl FnOnce(u32, &[ProjectionStatus]),
) -> anyhow::Result<RebuildReport> {
    if args.rate == Some(0) {
        return Err(usage("--rate must be at least 1 event per second"));
    }
    if args
        .partitions
        .is_some_and(|n| n == 0 || n > Partition::MAX)
    {
        return Err(usage(format!(
            "--partitions must be between 1 and {}",
            Partition::MAX
        )));
    }
    let projection = catalog.find(&args.name)?;
    let info = admin.info(&args.name).await?;
    let active = info.as_ref().and_then(|i| i.active_version);
    let count_of = |version: Option<u32>| {
        info.iter()
            .flat_map(|i| &i.versions)
            .find(|v| Some(v.version) == version)
            .map(|v| v.partitions)
    };
    // Resume a stopped rebuild (as the partitions it was started with);
    // else build the next version (or the code's own, when it is newer
    // than the active one), as the active version's partitions by default.
    let in_progress = info.as_ref().and_then(candidate_in_progress);
    let (version, partitions) = match in_progress {
        Some(version) => {
            let started_as = count_of(Some(version)).unwrap_or(1);
            if args.partitions.is_some_and(|n| n != started_as) {
                return Err(usage(format!(
                    "the rebuild of version {version} in progress runs as {started_as} partition(s): resume it as that, or discard it first"
                )));
            }
            (version, started_as)
        }
        None => (
            (active.unwrap_or(0) + 1).max(projection.version()),
            args.partitions.or(count_of(active)).unwrap_or(1),
        ),
    };
    let poison = catalog.poison_policy(&args.name);
    match db
        .sinks(catalog, &args.name, version, partitions, true)
        .await?
    {
        Sinks::Sqlite(sinks) => {
            build_and_swap(&store, sinks, args, (version, active), poison, on_start).await
        }
        Sinks::Postgres(sinks) => {
            build_and_swap(&store, sinks, args, (version, active), poison, on_start).await
        }
    }
}

async fn build_and_swap<S: VersionedSink + 'static>(
    store: &Arc<dyn EventStore>,
    sinks: Vec<S>,
    args: &RebuildArgs,
    (version, active): (u32, Option<u32>),
    poison: PoisonPolicy,
    on_start: impl FnOnce(u32, &[ProjectionStatus]),
) -> anyhow::Result<RebuildReport> {
    let started = std::time::Instant::now();
    let partitions = sinks.len() as u32;
    let mut runners: Vec<Runner<S>> = sinks
        .into_iter()
        .map(|sink| {
            let runner = Runner::new(store.clone(), sink)
                .with_policy(BatchPolicy::rebuild())
                .with_poison_policy(poison);
            match args.rate {
                // The limit is for the whole rebuild.
                Some(rate) => runner.with_rate_limit((rate / u64::from(partitions)).max(1)),
                None => runner,
            }
        })
        .collect();
    let statuses: Vec<ProjectionStatus> = runners.iter().map(|r| r.status()).collect();
    on_start(version, &statuses);
    let bar = (!args.quiet).then(|| progress_bar(&args.name, version, partitions));
    let shown = bar
        .clone()
        .map(|bar| tokio::spawn(show_progress(bar, statuses.clone())));
    // Replay up to the head, then once more for what was appended
    // meanwhile, until a pass finds nothing new.
    let mut events = 0;
    loop {
        let head = store.head_position().await?;
        let mut passes = tokio::task::JoinSet::new();
        for (index, mut runner) in runners.drain(..).enumerate() {
            passes.spawn(async move {
                let stats = runner.catch_up(head).await;
                (index, runner, stats)
            });
        }
        let mut back: Vec<Option<Runner<S>>> = (0..partitions).map(|_| None).collect();
        let mut lowest = u64::MAX;
        let mut first_error = None;
        while let Some(done) = passes.join_next().await {
            let (index, runner, stats) = done?;
            match stats {
                Ok(stats) => lowest = lowest.min(stats.checkpoint),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
            back[index] = Some(runner);
        }
        if let Some(e) = first_error {
            return Err(e.into());
        }
        runners = back.into_iter().flatten().collect();
        events = runners
            .iter()
            .map(|r| r.stats().events)
            .sum::<u64>()
            .max(events);
        if lowest >= store.head_position().await? {
            break;
        }
    }
    if let Some(shown) = shown {
        shown.abort();
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let checkpoint = runners
        .iter()
        .map(|r| r.stats().checkpoint)
        .min()
        .unwrap_or(0);
    let Some(mut sink) = runners.into_iter().next().map(Runner::into_sink) else {
        return Err(usage("a rebuild needs at least one partition"));
    };
    if args.diff {
        let diff = sink.diff(args.samples).await?;
        println!("{}", serde_json::json!({ "diff": diff }));
    }
    let (swapped, previous) = if args.no_swap {
        (false, active)
    } else {
        (true, sink.swap(args.keep_old).await?)
    };
    Ok(RebuildReport {
        projection: args.name.clone(),
        version,
        previous_version: previous,
        partitions,
        events,
        checkpoint,
        swapped,
        kept_old: swapped && args.keep_old,
        seconds: (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
    })
}

fn progress_bar(name: &str, version: u32, partitions: u32) -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:40}] {pos}/{len} events  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let split = match partitions {
        1 => String::new(),
        n => format!(" in {n} partitions"),
    };
    bar.set_prefix(format!("rebuilding {name} v{version}{split}"));
    bar
}

/// How far the partitions of a rebuild have come together: each passes
/// every position of the log, so the slowest one says.
pub fn slowest_progress(statuses: &[ProjectionStatus]) -> Option<Progress> {
    statuses
        .iter()
        .filter_map(|s| s.progress())
        .min_by_key(|p| p.done)
}

/// Shows the runners' progress (events of the log passed, rate, ETA),
/// until aborted. Each partition passes every position of the log: the
/// slowest one says how far the rebuild is.
async fn show_progress(bar: ProgressBar, statuses: Vec<ProjectionStatus>) {
    loop {
        if let Some(p) = slowest_progress(&statuses) {
            bar.set_length(p.total);
            bar.set_position(p.done);
            let eta = p.eta.map_or_else(
                || "?".to_owned(),
                |eta| format!("{:.0} s", eta.as_secs_f64()),
            );
            bar.set_message(format!("{:.0} events/s, ETA {eta}", p.events_per_second));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
