//! Partitioned projections (P10) on SQLite and PostgreSQL: N runners of one
//! projection side by side, each applying the streams that hash to it, in
//! per-stream order, with checkpoints of their own; the number of
//! partitions changes only by a rebuild.

use std::sync::Arc;

use factline_core::{EventData, EventStore, ExpectedVersion, RecordedEvent, StreamId};
use factline_projections::{
    partition_of, ApplyError, BatchPolicy, Partition, Portable, PostgresAdmin, PostgresSink,
    ProjectionError, ProjectionInfo, Runner, Sink, SqlProjection, SqliteAdmin, SqliteSink,
    Statement, Tables, VersionedSink,
};
use serde_json::json;

const STREAMS: u64 = 24;
const EVENTS_PER_STREAM: u64 = 60;

/// Per stream: the last version applied, how many events, and whether they
/// all came in order (0 once one did not).
struct StreamOrder(u32);

impl SqlProjection for StreamOrder {
    fn name(&self) -> &str {
        "stream_order"
    }
    fn version(&self) -> u32 {
        self.0
    }
    fn tables(&self) -> &[&str] {
        &["stream_order"]
    }
    fn create_tables(&self, t: &Tables) -> Vec<String> {
        vec![format!(
            "CREATE TABLE IF NOT EXISTS {} (
                 stream_id    TEXT   PRIMARY KEY,
                 last_version BIGINT NOT NULL,
                 n            BIGINT NOT NULL,
                 in_order     BIGINT NOT NULL
             )",
            t.get("stream_order")
        )]
    }
    fn statements(
        &mut self,
        t: &Tables,
        event: &RecordedEvent,
    ) -> Result<Vec<Statement>, ApplyError> {
        Ok(vec![Statement::new(
            format!(
                "INSERT INTO {} AS s (stream_id, last_version, n, in_order)
                 VALUES ($1, $2, 1, $3)
                 ON CONFLICT (stream_id) DO UPDATE SET
                     in_order = s.in_order * CASE WHEN s.last_version + 1 = excluded.last_version THEN 1 ELSE 0 END,
                     last_version = excluded.last_version,
                     n = s.n + 1",
                t.get("stream_order")
            ),
            vec![
                event.stream_id.to_string().into(),
                event.version.into(),
                u64::from(event.version == 1).into(),
            ],
        )])
    }
}

/// Streams appended to in turns by concurrent writers, so every batch of
/// the log mixes them.
async fn fill(store: &Arc<dyn EventStore>) {
    let mut writers = Vec::new();
    for s in 0..STREAMS {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let stream = StreamId::new(format!("Order-{s}")).unwrap();
            for k in 0..EVENTS_PER_STREAM {
                let event = EventData::new("Step", json!({ "k": k }));
                store
                    .append(&stream, ExpectedVersion::Exact(k), vec![event])
                    .await
                    .unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
}

/// One database kind: sinks for partitions and rebuilds, the admin view,
/// and the read model's rows.
#[async_trait::async_trait]
trait Db: Sync {
    type Sink: VersionedSink + 'static;
    fn store(&self) -> Arc<dyn EventStore>;
    async fn sink(&self, version: u32, partition: Partition, rebuild: bool) -> Self::Sink;
    async fn info(&self) -> ProjectionInfo;
    /// (stream, last version, n, in order)
    async fn rows(&self) -> Vec<(String, i64, i64, i64)>;
}

struct Sqlite {
    dir: tempfile::TempDir,
    store: Arc<dyn EventStore>,
}

impl Sqlite {
    fn path(&self) -> std::path::PathBuf {
        self.dir.path().join("events.db")
    }
}

#[async_trait::async_trait]
impl Db for Sqlite {
    type Sink = SqliteSink<Portable<StreamOrder>>;
    fn store(&self) -> Arc<dyn EventStore> {
        self.store.clone()
    }
    async fn sink(&self, version: u32, partition: Partition, rebuild: bool) -> Self::Sink {
        let projection = Portable::new(StreamOrder(version));
        let sink = match rebuild {
            false => SqliteSink::open(self.path(), projection),
            true => SqliteSink::open_rebuild(self.path(), projection),
        };
        sink.unwrap().with_partition(partition)
    }
    async fn info(&self) -> ProjectionInfo {
        let admin = SqliteAdmin::open(self.path()).unwrap();
        admin.projections().await.unwrap().remove(0)
    }
    async fn rows(&self) -> Vec<(String, i64, i64, i64)> {
        let conn = rusqlite::Connection::open(self.path()).unwrap();
        let mut stmt = conn
            .prepare(
                "SELECT stream_id, last_version, n, in_order FROM stream_order ORDER BY stream_id",
            )
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }
}

struct Postgres {
    db: factline_testkit::pg::TestDatabase,
    store: Arc<dyn EventStore>,
}

#[async_trait::async_trait]
impl Db for Postgres {
    type Sink = PostgresSink<Portable<StreamOrder>>;
    fn store(&self) -> Arc<dyn EventStore> {
        self.store.clone()
    }
    async fn sink(&self, version: u32, partition: Partition, rebuild: bool) -> Self::Sink {
        let projection = Portable::new(StreamOrder(version));
        let sink = match rebuild {
            false => PostgresSink::connect(&self.db.url, "read", projection).await,
            true => PostgresSink::connect_rebuild(&self.db.url, "read", projection).await,
        };
        sink.unwrap().with_partition(partition)
    }
    async fn info(&self) -> ProjectionInfo {
        let admin = PostgresAdmin::connect(&self.db.url, "read").await.unwrap();
        admin.projections().await.unwrap().remove(0)
    }
    async fn rows(&self) -> Vec<(String, i64, i64, i64)> {
        let (client, connection) = tokio_postgres::connect(&self.db.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
            .query(
                "SELECT stream_id, last_version, n, in_order FROM read.stream_order ORDER BY stream_id",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect()
    }
}

/// Runs every partition of `count` to the head at once; returns how many
/// streams each owns.
async fn run_partitions<D: Db>(db: &D, version: u32, count: u32, rebuild: bool) -> Vec<u64> {
    let mut tasks = Vec::new();
    for partition in Partition::all(count).unwrap() {
        let sink = db.sink(version, partition, rebuild).await;
        let mut runner = Runner::new(db.store(), sink);
        tasks.push(tokio::spawn(async move {
            runner.catch_up(u64::MAX).await.unwrap();
            runner.into_sink()
        }));
    }
    for task in tasks {
        let mut sink = task.await.unwrap();
        assert_eq!(
            sink.checkpoint().await.unwrap(),
            STREAMS * EVENTS_PER_STREAM
        );
    }
    // What each partition owns, by the same hash.
    (0..count)
        .map(|p| {
            (0..STREAMS)
                .filter(|s| partition_of(&format!("Order-{s}"), count) == p)
                .count() as u64
        })
        .collect()
}

fn assert_every_stream_whole_and_in_order(rows: &[(String, i64, i64, i64)]) {
    assert_eq!(rows.len() as u64, STREAMS);
    for (stream, last, n, in_order) in rows {
        let e = EVENTS_PER_STREAM as i64;
        assert_eq!((*last, *n, *in_order), (e, e, 1), "{stream}");
    }
}

async fn partitions_split_the_streams_and_change_only_by_a_rebuild<D: Db>(db: D) {
    fill(&db.store()).await;
    let owned = run_partitions(&db, 1, 4, false).await;
    assert!(
        owned.iter().filter(|n| **n > 0).count() >= 3,
        "the streams spread over the partitions: {owned:?}"
    );
    assert_every_stream_whole_and_in_order(&db.rows().await);
    let info = db.info().await;
    assert_eq!(info.active_version, Some(1));
    assert_eq!(info.checkpoint, STREAMS * EVENTS_PER_STREAM);
    assert_eq!((info.versions.len(), info.versions[0].partitions), (1, 4));

    // Version 1 runs as 4: a runner as 2 is refused, before writing.
    let mut wrong = Runner::new(
        db.store(),
        db.sink(1, Partition::new(0, 2).unwrap(), false).await,
    );
    db.store()
        .append(
            &StreamId::new("Order-late").unwrap(),
            ExpectedVersion::NoStream,
            vec![EventData::new("Step", json!({}))],
        )
        .await
        .unwrap();
    match wrong.catch_up(u64::MAX).await {
        Err(ProjectionError::Invalid { message, .. }) => {
            assert!(
                message.contains("partitions changes with a rebuild"),
                "{message}"
            )
        }
        other => panic!("a runner with another count ran: {other:?}"),
    }

    // A rebuild changes the count: version 2 as 2 partitions, swapped in,
    // and version 1's four checkpoints go with its tables.
    let head = db.store().head_position().await.unwrap();
    let mut sinks = Vec::new();
    for partition in Partition::all(2).unwrap() {
        let mut runner = Runner::new(db.store(), db.sink(2, partition, true).await);
        assert_eq!(runner.catch_up(head).await.unwrap().checkpoint, head);
        sinks.push(runner.into_sink());
    }
    assert_eq!(sinks[0].swap(false).await.unwrap(), Some(1));
    let info = db.info().await;
    assert_eq!(info.active_version, Some(2));
    assert_eq!(info.versions.len(), 1, "{info:?}");
    assert_eq!((info.versions[0].partitions, info.checkpoint), (2, head));
    let rows = db.rows().await;
    assert_eq!(rows.len() as u64, STREAMS + 1);
    assert_every_stream_whole_and_in_order(
        &rows
            .into_iter()
            .filter(|r| r.0 != "Order-late")
            .collect::<Vec<_>>(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_partitions_split_the_streams_and_change_only_by_a_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let store = factline_sqlite::SqliteStore::open(dir.path().join("events.db")).unwrap();
    let db = Sqlite {
        dir,
        store: Arc::new(store),
    };
    partitions_split_the_streams_and_change_only_by_a_rebuild(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_partitions_split_the_streams_and_change_only_by_a_rebuild() {
    let db = factline_testkit::pg::database().await;
    let store = factline_postgres::PostgresStore::connect(&db.url)
        .await
        .unwrap();
    let db = Postgres {
        db,
        store: Arc::new(store),
    };
    partitions_split_the_streams_and_change_only_by_a_rebuild(db).await;
}

/// Counts every event in two shared rows, `a` and `b`, touching them in
/// an order that depends on the event's stream: partitions that run side
/// by side lock the rows in opposite orders and deadlock.
struct Crossed;

impl SqlProjection for Crossed {
    fn name(&self) -> &str {
        "crossed"
    }
    fn tables(&self) -> &[&str] {
        &["crossed"]
    }
    fn create_tables(&self, t: &Tables) -> Vec<String> {
        vec![format!(
            "CREATE TABLE IF NOT EXISTS {} (k TEXT PRIMARY KEY, n BIGINT NOT NULL)",
            t.get("crossed")
        )]
    }
    fn statements(
        &mut self,
        t: &Tables,
        event: &RecordedEvent,
    ) -> Result<Vec<Statement>, ApplyError> {
        let bump = |k: &str| {
            Statement::new(
                format!(
                    "INSERT INTO {} AS c (k, n) VALUES ($1, 1)
                     ON CONFLICT (k) DO UPDATE SET n = c.n + 1",
                    t.get("crossed")
                ),
                vec![k.into()],
            )
        };
        Ok(match partition_of(event.stream_id.as_str(), 2) {
            0 => vec![bump("a"), bump("b")],
            _ => vec![bump("b"), bump("a")],
        })
    }
}

/// Two partitions that deadlock each other on PostgreSQL still apply every
/// event exactly once: the server aborts one batch, which is run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_partitions_that_deadlock_apply_every_event_once() {
    let db = factline_testkit::pg::database().await;
    let store: Arc<dyn EventStore> = Arc::new(
        factline_postgres::PostgresStore::connect(&db.url)
            .await
            .unwrap(),
    );
    fill(&store).await;
    let total = (STREAMS * EVENTS_PER_STREAM) as i64;
    let mut tasks = Vec::new();
    for partition in Partition::all(2).unwrap() {
        let sink = PostgresSink::connect(&db.url, "read", Portable::new(Crossed))
            .await
            .unwrap()
            .with_partition(partition);
        // Small batches, many of them: many chances to deadlock.
        let mut runner = Runner::new(store.clone(), sink).with_policy(BatchPolicy {
            max_events: 8,
            max_wait: std::time::Duration::from_millis(100),
        });
        tasks.push(tokio::spawn(async move { runner.catch_up(u64::MAX).await }));
    }
    for task in tasks {
        let stats = task.await.unwrap().unwrap();
        assert_eq!(stats.checkpoint, total as u64);
    }
    let (client, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let rows: Vec<(String, i64)> = client
        .query("SELECT k, n FROM read.crossed ORDER BY k", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows, [("a".to_owned(), total), ("b".to_owned(), total)]);
}
