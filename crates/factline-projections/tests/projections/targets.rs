//! The read models the projection tests run, and where: SQLite and
//! PostgreSQL, in the events' own database and in another one.

use async_trait::async_trait;
use factline_core::{EventData, EventStore, ExpectedVersion, RecordedEvent, StreamId};
use factline_projections::{
    ApplyError, Parking, PostgresAdmin, PostgresProjection, PostgresSink, ProjectionInfo, Sink,
    SqliteAdmin, SqliteProjection, SqliteSink, Tables, VersionedSink,
};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Counts events per type; refuses the event at `refuse_at`.
pub(crate) struct Counts {
    pub(crate) refuse_at: Option<u64>,
    pub(crate) version: u32,
    /// Events of this type are left out.
    pub(crate) skip: Option<&'static str>,
    /// What each event adds to its type's count.
    pub(crate) weight: i64,
}

impl SqliteProjection for Counts {
    fn name(&self) -> &str {
        "counts"
    }
    fn version(&self) -> u32 {
        self.version
    }
    fn tables(&self) -> &[&str] {
        &["counts"]
    }
    fn setup(&mut self, tx: &rusqlite::Transaction<'_>, tables: &Tables) -> rusqlite::Result<()> {
        tx.execute(
            &format!(
                "CREATE TABLE IF NOT EXISTS {} (event_type TEXT PRIMARY KEY, n INTEGER NOT NULL)",
                tables.get("counts")
            ),
            [],
        )
        .map(|_| ())
    }
    fn apply(
        &mut self,
        tx: &rusqlite::Transaction<'_>,
        tables: &Tables,
        event: &RecordedEvent,
    ) -> Result<(), ApplyError> {
        if self.refuse_at == Some(event.position) {
            return Err(ApplyError::new("refused on purpose"));
        }
        if self.skip == Some(event.event_type.as_str()) {
            return Ok(());
        }
        tx.execute(
            &format!(
                "INSERT INTO {} (event_type, n) VALUES (?1, ?2)
                 ON CONFLICT (event_type) DO UPDATE SET n = n + excluded.n",
                tables.get("counts")
            ),
            rusqlite::params![event.event_type, self.weight],
        )?;
        Ok(())
    }
}

#[async_trait]
impl PostgresProjection for Counts {
    fn name(&self) -> &str {
        "counts"
    }
    fn version(&self) -> u32 {
        self.version
    }
    fn tables(&self) -> &[&str] {
        &["counts"]
    }
    async fn setup(
        &mut self,
        tx: &tokio_postgres::Transaction<'_>,
        tables: &Tables,
    ) -> Result<(), tokio_postgres::Error> {
        tx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {} (event_type text PRIMARY KEY, n bigint NOT NULL)",
            tables.get("counts")
        ))
        .await
    }
    async fn apply(
        &mut self,
        tx: &tokio_postgres::Transaction<'_>,
        tables: &Tables,
        event: &RecordedEvent,
    ) -> Result<(), ApplyError> {
        if self.refuse_at == Some(event.position) {
            return Err(ApplyError::new("refused on purpose"));
        }
        if self.skip == Some(event.event_type.as_str()) {
            return Ok(());
        }
        let table = tables.get("counts");
        tx.execute(
            &format!(
                "INSERT INTO {table} AS c (event_type, n) VALUES ($1, $2)
                 ON CONFLICT (event_type) DO UPDATE SET n = c.n + excluded.n"
            ),
            &[&event.event_type, &self.weight],
        )
        .await?;
        Ok(())
    }
}

/// A store and a read-model database beside it.
#[async_trait]
pub(crate) trait Target: Sized + Sync {
    type Sink: VersionedSink + Parking + 'static;
    async fn start() -> Self;
    fn store(&self) -> Arc<dyn EventStore>;
    /// A sink for `counts`: a live one, or (`rebuild`) one building its
    /// version beside the active one.
    async fn open(&self, counts: Counts, rebuild: bool) -> Self::Sink;
    async fn sink(&self, refuse_at: Option<u64>) -> Self::Sink {
        let counts = Counts {
            refuse_at,
            ..version(1)
        };
        self.open(counts, false).await
    }
    async fn has_table(sink: &mut Self::Sink, table: &str) -> bool;
    /// What an operator sees of the read-model database's projections.
    async fn projections(&self) -> Vec<ProjectionInfo>;
    /// Pauses or resumes, as an operator in another process would.
    async fn set_paused(&self, name: &str, paused: bool);
    /// The read model and the checkpoint, read in one go.
    async fn read_model(sink: &mut Self::Sink) -> (BTreeMap<String, i64>, u64);
}

/// `SAME`: the read model is in the events' file; else in a file of its own.
pub(crate) struct Sqlite<const SAME: bool> {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) store: Arc<dyn EventStore>,
}

#[async_trait]
impl<const SAME: bool> Target for Sqlite<SAME> {
    type Sink = SqliteSink<Counts>;
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = factline_sqlite::SqliteStore::open(dir.path().join("events.db")).unwrap();
        Sqlite {
            dir,
            store: Arc::new(store),
        }
    }
    fn store(&self) -> Arc<dyn EventStore> {
        self.store.clone()
    }
    async fn open(&self, counts: Counts, rebuild: bool) -> Self::Sink {
        let path = self.read_path();
        match rebuild {
            false => SqliteSink::open(path, counts).unwrap(),
            true => SqliteSink::open_rebuild(path, counts).unwrap(),
        }
    }
    async fn projections(&self) -> Vec<ProjectionInfo> {
        let path = self.read_path();
        SqliteAdmin::open(path)
            .unwrap()
            .projections()
            .await
            .unwrap()
    }
    async fn set_paused(&self, name: &str, paused: bool) {
        let admin = SqliteAdmin::open(self.read_path()).unwrap();
        admin.set_paused(name, paused).await.unwrap()
    }
    async fn has_table(sink: &mut Self::Sink, table: &str) -> bool {
        let table = table.to_owned();
        sink.query(move |conn| {
            conn.query_row(
                "SELECT count(*) > 0 FROM sqlite_master WHERE name = ?1",
                [table],
                |r| r.get(0),
            )
        })
        .await
        .unwrap()
    }
    async fn read_model(sink: &mut Self::Sink) -> (BTreeMap<String, i64>, u64) {
        let counts = sink
            .query(|conn| {
                let exists: bool = conn.query_row(
                    "SELECT count(*) > 0 FROM sqlite_master WHERE name = 'counts'",
                    [],
                    |r| r.get(0),
                )?;
                if !exists {
                    return Ok(BTreeMap::new());
                }
                let mut stmt = conn.prepare("SELECT event_type, n FROM counts")?;
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect()
            })
            .await
            .unwrap();
        (counts, sink.checkpoint().await.unwrap())
    }
}

impl<const SAME: bool> Sqlite<SAME> {
    pub(crate) fn read_path(&self) -> std::path::PathBuf {
        self.dir
            .path()
            .join(if SAME { "events.db" } else { "read.db" })
    }
}

/// `SAME`: the read model is in the events' database; else in another.
pub(crate) struct Postgres<const SAME: bool> {
    pub(crate) events: factline_testkit::pg::TestDatabase,
    pub(crate) read: factline_testkit::pg::TestDatabase,
    pub(crate) store: Arc<dyn EventStore>,
}

#[async_trait]
impl<const SAME: bool> Target for Postgres<SAME> {
    type Sink = PostgresSink<Counts>;
    async fn start() -> Self {
        let events = factline_testkit::pg::database().await;
        let read = factline_testkit::pg::database().await;
        let store = factline_postgres::PostgresStore::connect(&events.url)
            .await
            .unwrap();
        Postgres {
            events,
            read,
            store: Arc::new(store),
        }
    }
    fn store(&self) -> Arc<dyn EventStore> {
        self.store.clone()
    }
    async fn projections(&self) -> Vec<ProjectionInfo> {
        let admin = PostgresAdmin::connect(self.read_url(), "read").await;
        admin.unwrap().projections().await.unwrap()
    }
    async fn set_paused(&self, name: &str, paused: bool) {
        let admin = PostgresAdmin::connect(self.read_url(), "read").await;
        admin.unwrap().set_paused(name, paused).await.unwrap()
    }
    async fn open(&self, counts: Counts, rebuild: bool) -> Self::Sink {
        let url = self.read_url();
        match rebuild {
            false => PostgresSink::connect(url, "read", counts).await.unwrap(),
            true => PostgresSink::connect_rebuild(url, "read", counts)
                .await
                .unwrap(),
        }
    }
    async fn has_table(sink: &mut Self::Sink, table: &str) -> bool {
        let name = format!("read.{table}");
        sink.client()
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
            .await
            .unwrap()
            .get(0)
    }
    async fn read_model(sink: &mut Self::Sink) -> (BTreeMap<String, i64>, u64) {
        let rows = sink
            .client()
            .query(
                "SELECT event_type, n FROM read.counts
                 WHERE to_regclass('read.counts') IS NOT NULL",
                &[],
            )
            .await
            .unwrap_or_default();
        let counts = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        (counts, sink.checkpoint().await.unwrap())
    }
}

impl<const SAME: bool> Postgres<SAME> {
    fn read_url(&self) -> &str {
        if SAME {
            &self.events.url
        } else {
            &self.read.url
        }
    }
}

pub(crate) const TYPES: [&str; 3] = ["Placed", "Paid", "Shipped"];

/// `n` events over a few streams; event k has type `TYPES[k % 3]`.
pub(crate) async fn append(store: &Arc<dyn EventStore>, n: u64) {
    for chunk in 0..n.div_ceil(100) {
        let events = (chunk * 100..(chunk * 100 + 100).min(n))
            .map(|k| EventData::new(TYPES[(k % 3) as usize], json!({ "k": k })))
            .collect();
        let stream = StreamId::new(format!("Order-{}", chunk % 7)).unwrap();
        store
            .append(&stream, ExpectedVersion::Any, events)
            .await
            .unwrap();
    }
}

pub(crate) fn expected_counts(n: u64) -> BTreeMap<String, i64> {
    let mut counts = BTreeMap::new();
    for k in 0..n {
        *counts
            .entry(TYPES[(k % 3) as usize].to_string())
            .or_default() += 1;
    }
    counts
}

/// Version `n` counts each event `n` times, so versions differ.
pub(crate) fn version(version: u32) -> Counts {
    Counts {
        refuse_at: None,
        version,
        skip: None,
        weight: i64::from(version),
    }
}

macro_rules! on_every_target {
    ($($case:ident),* $(,)?) => {
        on_every_target!(@in sqlite_same_file, super::Sqlite<true>; $($case),*);
        on_every_target!(@in sqlite_other_file, super::Sqlite<false>; $($case),*);
        on_every_target!(@in postgres_same_database, super::Postgres<true>; $($case),*);
        on_every_target!(@in postgres_other_database, super::Postgres<false>; $($case),*);
    };
    (@in $module:ident, $target:ty; $($case:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::$case::<$target>().await;
                }
            )*
        }
    };
}
