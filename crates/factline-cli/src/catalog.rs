//! The projections this process can run — read models declared in a
//! definitions file (`--read-models`), and any given besides — where their
//! read models live for a `--db`, and running them live so that they
//! follow a swap made by a rebuild in another process.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use factline::{EventStore, Location, StorageError};
use factline_projections::{
    ParkedEvent, Partition, Partitioned, PoisonPolicy, Portable, PostgresAdmin, PostgresSink,
    ProjectionError, ProjectionInfo, ProjectionStatus, RetryPolicy, Runner, RunnerStats, Sink,
    SqlProjection, SqliteAdmin, SqliteSink,
};
use factline_read_models::{DeclaredProjection, Definitions, LoadError, OnError, ReadModel};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::usage;

/// The PostgreSQL schema of the read models unless `--schema` says
/// otherwise (a public default, named when the demo was the only domain).
pub const READ_SCHEMA: &str = "orders_read";

/// The projections this process can run, rebuild and retry: read models
/// declared in a definitions file, and any given besides (the demo's).
#[derive(Clone, Default)]
pub struct Catalog {
    declared: Arc<Definitions>,
}

impl Catalog {
    /// `besides` and the read models of the definitions file at `path` if
    /// given; a file with mistakes is a usage error listing each with its
    /// line and column, and so is a name both declare.
    pub fn load(path: Option<&Path>, besides: Definitions) -> anyhow::Result<Self> {
        let mut all = besides.read_models().to_vec();
        if let Some(path) = path {
            let file = Definitions::load(path).map_err(|e| match e {
                LoadError::Invalid(errors) => usage(errors.to_string()),
                other => usage(other.to_string()),
            })?;
            for model in file.read_models() {
                if all.iter().any(|m: &ReadModel| m.name() == model.name()) {
                    let names: Vec<&str> = besides.read_models().iter().map(|m| m.name()).collect();
                    return Err(usage(format!(
                        "{}: read model {:?} has the name of one this process runs besides ({}); give it another name",
                        path.display(),
                        model.name(),
                        names.join(", ")
                    )));
                }
                all.push(model.clone());
            }
        }
        Ok(Catalog {
            declared: Arc::new(Definitions::from_read_models(all)),
        })
    }

    /// The declared read models.
    pub fn definitions(&self) -> Arc<Definitions> {
        self.declared.clone()
    }

    /// The names of the declared read models.
    pub fn declared(&self) -> Vec<String> {
        self.declared
            .read_models()
            .iter()
            .map(|m| m.name().to_owned())
            .collect()
    }

    /// Every projection this process can run.
    pub fn known(&self) -> Vec<Box<dyn SqlProjection>> {
        self.declared
            .read_models()
            .iter()
            .map(|model| {
                Box::new(DeclaredProjection::new(Arc::new(model.clone()))) as Box<dyn SqlProjection>
            })
            .collect()
    }

    /// What a runner of `name` does with an event it cannot apply: what
    /// its definition says (`on_error`).
    pub fn poison_policy(&self, name: &str) -> PoisonPolicy {
        match self.declared.get(name).map(|m| m.on_error()) {
            Some(OnError::Stop) => PoisonPolicy::Stop,
            _ => PoisonPolicy::Park,
        }
    }

    /// The projection called `name`, or a usage error naming the known ones.
    pub fn find(&self, name: &str) -> anyhow::Result<Box<dyn SqlProjection>> {
        let all = self.known();
        let names: Vec<String> = all.iter().map(|p| p.name().to_owned()).collect();
        all.into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| {
                usage(format!(
                    "factline has no code for a projection {name:?} (it knows {}); read models declared in a file are run with --read-models FILE, projections of your own code by the service that defines them",
                    names.join(", ")
                ))
            })
    }
}

/// A read-model database: the SQLite file of the events, or a schema of
/// the PostgreSQL database.
#[derive(Clone, Debug)]
pub enum ReadModelDb {
    Sqlite(PathBuf),
    Postgres { url: String, schema: String },
}

/// Operators' access to a read-model database.
pub enum Admin {
    Sqlite(SqliteAdmin),
    Postgres(PostgresAdmin),
}

impl ReadModelDb {
    /// Where the read models of the store at `location` are; `memory:` has
    /// none that outlive the process.
    pub fn for_location(location: &Location, schema: &str) -> anyhow::Result<Self> {
        match location {
            Location::Sqlite(path) => {
                // A file of its own may be named in a directory that does
                // not exist yet, as the events' file may.
                if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    std::fs::create_dir_all(parent).map_err(|e| {
                        usage(format!("cannot create {} for the read models: {e}", parent.display()))
                    })?;
                }
                Ok(ReadModelDb::Sqlite(path.clone()))
            }
            Location::Postgres(url) => Ok(ReadModelDb::Postgres {
                url: url.clone(),
                schema: schema.to_owned(),
            }),
            _ => Err(usage(
                "an in-memory store keeps no read models between runs: give --db a SQLite file or a postgres:// URL",
            )),
        }
    }

    pub async fn admin(&self) -> Result<Admin, ProjectionError> {
        Ok(match self {
            ReadModelDb::Sqlite(path) => Admin::Sqlite(SqliteAdmin::open(path)?),
            ReadModelDb::Postgres { url, schema } => {
                Admin::Postgres(PostgresAdmin::connect(url, schema).await?)
            }
        })
    }

    /// The version a live runner of `projection` writes — the active one,
    /// unless the code is newer (then it waits for a rebuild to build it) —
    /// and how many partitions that version runs as.
    async fn live_version(
        &self,
        projection: &dyn SqlProjection,
    ) -> Result<(u32, u32), ProjectionError> {
        let info = self.admin().await?.info(projection.name()).await?;
        let active = info.as_ref().and_then(|i| i.active_version).unwrap_or(0);
        let version = active.max(projection.version());
        let partitions = info
            .iter()
            .flat_map(|i| &i.versions)
            .find(|v| v.version == version)
            .map_or(1, |v| v.partitions);
        Ok((version, partitions))
    }

    /// Sinks for every partition of `version` of the known projection
    /// `name`, live or to rebuild.
    pub async fn sinks(
        &self,
        catalog: &Catalog,
        name: &str,
        version: u32,
        partitions: u32,
        rebuild: bool,
    ) -> anyhow::Result<Sinks> {
        let partitions = Partition::all(partitions)?;
        let projection = || anyhow::Ok(Portable::new(catalog.find(name)?).at_version(version));
        let sinks = match self {
            ReadModelDb::Sqlite(path) => {
                let mut all = Vec::with_capacity(partitions.len());
                for partition in partitions {
                    let sink = match rebuild {
                        false => SqliteSink::open(path, projection()?)?,
                        true => SqliteSink::open_rebuild(path, projection()?)?,
                    };
                    all.push(sink.with_partition(partition));
                }
                Sinks::Sqlite(all)
            }
            ReadModelDb::Postgres { url, schema } => {
                let mut all = Vec::with_capacity(partitions.len());
                for partition in partitions {
                    // Live runners in several processes share the work
                    // through leases: one owner per partition, the others
                    // stand by (P12). A second rebuild is refused by the
                    // checkpoint's fence instead of waiting.
                    let sink = match rebuild {
                        false => PostgresSink::connect(url, schema, projection()?)
                            .await?
                            .with_lease(),
                        true => PostgresSink::connect_rebuild(url, schema, projection()?).await?,
                    };
                    all.push(sink.with_partition(partition));
                }
                Sinks::Postgres(all)
            }
        };
        Ok(sinks)
    }
}

impl Admin {
    pub async fn projections(&self) -> Result<Vec<ProjectionInfo>, ProjectionError> {
        match self {
            Admin::Sqlite(a) => a.projections().await,
            Admin::Postgres(a) => a.projections().await,
        }
    }

    pub async fn info(&self, name: &str) -> Result<Option<ProjectionInfo>, ProjectionError> {
        Ok(self
            .projections()
            .await?
            .into_iter()
            .find(|p| p.name == name))
    }

    pub async fn set_paused(&mut self, name: &str, paused: bool) -> Result<(), ProjectionError> {
        match self {
            Admin::Sqlite(a) => a.set_paused(name, paused).await,
            Admin::Postgres(a) => a.set_paused(name, paused).await,
        }
    }

    pub async fn parked(&self, name: &str) -> Result<Vec<ParkedEvent>, ProjectionError> {
        match self {
            Admin::Sqlite(a) => a.parked(name).await,
            Admin::Postgres(a) => a.parked(name).await,
        }
    }

    pub async fn skip(&self, name: &str, position: u64) -> Result<bool, ProjectionError> {
        match self {
            Admin::Sqlite(a) => a.skip(name, position).await,
            Admin::Postgres(a) => a.skip(name, position).await,
        }
    }
}

/// The sinks of a known projection's partitions, of one database kind.
pub enum Sinks {
    Sqlite(Vec<SqliteSink<Portable<Box<dyn SqlProjection>>>>),
    Postgres(Vec<PostgresSink<Portable<Box<dyn SqlProjection>>>>),
}

pub type Running = (
    ProjectionStatus,
    JoinHandle<Result<RunnerStats, ProjectionError>>,
);

/// Runs the known projection `name` live until `stop`, at the active
/// version; when a rebuild elsewhere swaps in another version, it starts
/// again on that one. The status stays the same across such restarts.
pub fn spawn_live(
    catalog: &Catalog,
    db: &ReadModelDb,
    store: &Arc<dyn EventStore>,
    name: &str,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<Running> {
    catalog.find(name)?;
    let status = ProjectionStatus::new(name);
    let (db, store, name, stop) = (db.clone(), store.clone(), name.to_owned(), stop.clone());
    let catalog = catalog.clone();
    let poison = catalog.poison_policy(&name);
    let shared = status.clone();
    let task = tokio::spawn(async move {
        let failed = |e: anyhow::Error| {
            ProjectionError::read_model(name.clone(), StorageError::new(format!("{e:#}")))
        };
        loop {
            let projection = catalog.find(&name).map_err(failed)?;
            if rebuild_if_newer(&catalog, &db, &store, projection.as_ref(), &stop).await? {
                // Stopped while rebuilding: it resumes at the next start.
                return Ok(RunnerStats::default());
            }
            let (version, partitions) = db.live_version(projection.as_ref()).await?;
            let ran = match db
                .sinks(&catalog, &name, version, partitions, false)
                .await
                .map_err(failed)?
            {
                Sinks::Sqlite(sinks) => run(&store, sinks, &shared, &stop, poison).await,
                Sinks::Postgres(sinks) => run(&store, sinks, &shared, &stop, poison).await,
            };
            match ran {
                Err(ProjectionError::NotActive { active, .. }) => {
                    tracing::info!(projection = %name, version = active, "following the version a rebuild swapped in");
                }
                // Another process runs it too (SQLite has no leases): start
                // again from where that one got to.
                Err(ProjectionError::Contended { found, .. }) => {
                    tracing::info!(projection = %name, checkpoint = found, "another process applied these events; following on");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                other => return other,
            }
        }
    });
    Ok((status, task))
}

/// A definition whose version is newer than the active one (edited, its
/// version raised) is built beside the active one, which serves reads
/// until the swap: blue/green, as `projections rebuild` does. Another
/// process may be rebuilding it already: then this one waits and tries
/// again. `Ok(true)` when `stop` came first.
async fn rebuild_if_newer(
    catalog: &Catalog,
    db: &ReadModelDb,
    store: &Arc<dyn EventStore>,
    projection: &dyn SqlProjection,
    stop: &watch::Receiver<bool>,
) -> Result<bool, ProjectionError> {
    let name = projection.name();
    loop {
        let admin = db.admin().await?;
        let active = admin.info(name).await?.and_then(|i| i.active_version);
        let Some(active) = active.filter(|a| *a < projection.version()) else {
            return Ok(false);
        };
        tracing::info!(projection = %name, active, version = projection.version(), "the definition is newer than the active version: rebuilding it beside");
        let args = crate::projections_cli::RebuildArgs {
            name: name.to_owned(),
            quiet: true,
            ..Default::default()
        };
        let rebuild =
            crate::projections_cli::rebuild(catalog, db, &admin, store.clone(), &args, |_, _| {});
        let mut stop = stop.clone();
        tokio::select! {
            done = rebuild => match done {
                Ok(report) => {
                    tracing::info!(projection = %name, version = report.version, events = report.events, "rebuilt and swapped in");
                }
                Err(e) => {
                    tracing::warn!(projection = %name, error = %format!("{e:#}"), "the rebuild did not finish; trying again");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            },
            _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => return Ok(true),
        }
    }
}

async fn run<S: Sink + 'static>(
    store: &Arc<dyn EventStore>,
    sinks: Vec<S>,
    status: &ProjectionStatus,
    stop: &watch::Receiver<bool>,
    poison: PoisonPolicy,
) -> Result<RunnerStats, ProjectionError> {
    let configure = |runner: Runner<S>| {
        runner
            .with_retries(RetryPolicy {
                attempts: 3,
                first_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_secs(1),
            })
            .with_poison_policy(poison)
    };
    let stats = Partitioned::new(store.clone(), sinks, configure)
        .with_status(status.clone())
        .run(stop.clone())
        .await?;
    Ok(RunnerStats {
        batches: stats.iter().map(|s| s.batches).sum(),
        events: stats.iter().map(|s| s.events).sum(),
        checkpoint: stats.iter().map(|s| s.checkpoint).min().unwrap_or(0),
        largest_batch: stats.iter().map(|s| s.largest_batch).max().unwrap_or(0),
    })
}
