//! Inline projections (C6) on SQLite and PostgreSQL: the writer updates the read model in
//! the append's own transaction, so it is never behind; a refused event
//! fails its own append only, with nothing of it written; events appended
//! without the projection are applied before the next append, and at open.

use std::sync::Arc;

use factline_core::{EventData, EventStore, ExpectedVersion, RecordedEvent, StoreError, StreamId};
use factline_postgres::{PostgresConfig, PostgresStore};
use factline_projections::{
    ApplyError, PostgresAdmin, PostgresInline, SqlProjection, SqliteAdmin, SqliteInline,
    SqliteProjection, Statement, Tables,
};
use factline_sqlite::{SqliteConfig, SqliteStore};
use serde_json::json;

/// User names, unique across all `User-…` streams: the classic read model
/// that must be exact at once.
struct UserNames;

impl SqliteProjection for UserNames {
    fn name(&self) -> &str {
        "user_names"
    }
    fn tables(&self) -> &[&str] {
        &["user_names"]
    }
    fn setup(&mut self, tx: &rusqlite::Transaction<'_>, t: &Tables) -> rusqlite::Result<()> {
        tx.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {} (name TEXT PRIMARY KEY, stream_id TEXT NOT NULL)",
            t.get("user_names")
        ))
    }
    fn apply(
        &mut self,
        tx: &rusqlite::Transaction<'_>,
        t: &Tables,
        event: &RecordedEvent,
    ) -> Result<(), ApplyError> {
        if event.event_type != "UserRegistered" {
            return Ok(());
        }
        let data = event.data.to_value().unwrap();
        let name = data["name"].as_str().unwrap_or_default();
        let inserted = tx.execute(
            &format!(
                "INSERT INTO {} (name, stream_id) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                t.get("user_names")
            ),
            rusqlite::params![name, event.stream_id.as_str()],
        )?;
        match inserted {
            1 => Ok(()),
            _ => Err(ApplyError::new(format!("the name {name:?} is taken"))),
        }
    }
}

fn open(path: &std::path::Path) -> Arc<dyn EventStore> {
    let inline = SqliteInline::new(UserNames).unwrap();
    Arc::new(
        SqliteStore::open_with_inline(SqliteConfig::new(path), vec![Box::new(inline)]).unwrap(),
    )
}

/// Appends `stream`'s registration of `name` to a new stream.
async fn register(
    store: &dyn EventStore,
    stream: &str,
    name: &str,
) -> Result<factline_core::AppendResult, StoreError> {
    let stream = StreamId::new(stream).unwrap();
    store
        .append(&stream, ExpectedVersion::NoStream, registered(name))
        .await
}

fn registered(name: &str) -> Vec<EventData> {
    vec![EventData::new("UserRegistered", json!({ "name": name }))]
}

/// 32 concurrent registrations after "ada" is taken (so they share group
/// commits); every fourth takes "ada" again and must fail alone with
/// `refusal` in its message, with nothing of it written and no hole in the
/// log: 24 accepted, positions 1..=25.
async fn registrations_race_for_a_taken_name(store: &Arc<dyn EventStore>, refusal: &str) {
    let mut tasks = Vec::new();
    for i in 0..32 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let name = if i % 4 == 0 {
                "ada".to_owned()
            } else {
                format!("user-{i}")
            };
            let stream = StreamId::new(format!("User-{i}")).unwrap();
            (
                i,
                store
                    .append(&stream, ExpectedVersion::NoStream, registered(&name))
                    .await,
            )
        }));
    }
    let mut accepted = 0;
    for task in tasks {
        let (i, result) = task.await.unwrap();
        match result {
            Ok(_) => {
                assert_ne!(i % 4, 0);
                accepted += 1;
            }
            Err(StoreError::InlineRefused {
                projection,
                message,
            }) => {
                assert_eq!((i % 4, projection.as_str()), (0, "user_names"));
                assert!(message.contains(refusal), "{message}");
                // Nothing of it was written.
                let stream = StreamId::new(format!("User-{i}")).unwrap();
                let read = store
                    .read_stream(&stream, factline_core::ReadStream::forwards())
                    .await
                    .unwrap();
                assert!(read.is_empty());
            }
            Err(other) => panic!("append {i}: {other}"),
        }
    }
    assert_eq!(accepted, 24);
    // The log has no hole where the refused appends were.
    let all = store.read_all(1, usize::MAX).await.unwrap();
    let positions: Vec<u64> = all.iter().map(|e| e.position).collect();
    assert_eq!(positions, (1..=25).collect::<Vec<_>>());
}

fn names(path: &std::path::Path) -> Vec<(String, String)> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut stmt = conn
        .prepare("SELECT name, stream_id FROM user_names ORDER BY name")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_read_model_is_exact_when_the_append_returns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let store = open(&path);
    for (i, name) in ["ada", "grace", "alan"].iter().enumerate() {
        let stream = StreamId::new(format!("User-{i}")).unwrap();
        store
            .append(&stream, ExpectedVersion::NoStream, registered(name))
            .await
            .unwrap();
        // Read from another connection right away: already there.
        assert_eq!(names(&path).len(), i + 1);
    }
    let admin = SqliteAdmin::open(&path).unwrap();
    let info = admin.projections().await.unwrap().remove(0);
    assert_eq!(
        (info.name.as_str(), info.active_version, info.checkpoint),
        ("user_names", Some(1), 3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_event_fails_its_own_append_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let store = open(&path);
    register(&*store, "User-first", "ada").await.unwrap();
    registrations_race_for_a_taken_name(&store, "\"ada\" is taken").await;
    let names = names(&path);
    assert_eq!(names.len(), 25);
    assert!(names.contains(&("ada".to_owned(), "User-first".to_owned())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_appended_without_it_are_applied_at_open_and_before_the_next_append() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    {
        // History from before the projection existed.
        let plain = SqliteStore::open(&path).unwrap();
        for i in 0..5 {
            let stream = StreamId::new(format!("User-old{i}")).unwrap();
            plain
                .append(
                    &stream,
                    ExpectedVersion::NoStream,
                    registered(&format!("old-{i}")),
                )
                .await
                .unwrap();
        }
    }
    let store = open(&path);
    assert_eq!(names(&path).len(), 5, "caught up when the store opened");
    // Another store on the file, without the projection (another process).
    let plain = SqliteStore::open(&path).unwrap();
    register(&plain, "User-side", "side").await.unwrap();
    // The next append through the store with the projection applies the
    // gap first, so a name taken there is refused here.
    let refused = register(&*store, "User-dup", "side").await;
    assert!(
        matches!(refused, Err(StoreError::InlineRefused { .. })),
        "{refused:?}"
    );
    register(&*store, "User-new", "new").await.unwrap();
    let names = names(&path);
    assert_eq!(names.len(), 7);
    assert!(names.contains(&("side".to_owned(), "User-side".to_owned())));
}

/// The same read model as SQL for PostgreSQL: a name taken twice breaks
/// the primary key, which refuses the append that brought it.
struct UserNamesSql;

impl SqlProjection for UserNamesSql {
    fn name(&self) -> &str {
        "user_names"
    }
    fn tables(&self) -> &[&str] {
        &["user_names"]
    }
    fn create_tables(&self, t: &Tables) -> Vec<String> {
        vec![format!(
            "CREATE TABLE IF NOT EXISTS {} (name TEXT PRIMARY KEY, stream_id TEXT NOT NULL)",
            t.get("user_names")
        )]
    }
    fn statements(
        &mut self,
        t: &Tables,
        event: &RecordedEvent,
    ) -> Result<Vec<Statement>, ApplyError> {
        if event.event_type != "UserRegistered" {
            return Ok(Vec::new());
        }
        let name = event.data.to_value().unwrap()["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        Ok(vec![Statement::new(
            format!(
                "INSERT INTO {} (name, stream_id) VALUES ($1, $2)",
                t.get("user_names")
            ),
            vec![name.into(), event.stream_id.to_string().into()],
        )])
    }
}

async fn open_postgres(url: &str) -> Arc<dyn EventStore> {
    let inline = PostgresInline::new(UserNamesSql, "read").unwrap();
    let store =
        PostgresStore::connect_with_inline(PostgresConfig::new(url), vec![Box::new(inline)]);
    Arc::new(store.await.unwrap())
}

async fn postgres_names(url: &str) -> Vec<(String, String)> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .query(
            "SELECT name, stream_id FROM read.user_names ORDER BY name",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_inline_read_model_is_exact_and_refusals_fail_their_own_append() {
    let db = factline_testkit::pg::database().await;
    let store = open_postgres(&db.url).await;
    register(&*store, "User-first", "ada").await.unwrap();
    assert_eq!(
        postgres_names(&db.url).await.len(),
        1,
        "there when the append returns"
    );
    registrations_race_for_a_taken_name(&store, "23505").await;
    assert_eq!(postgres_names(&db.url).await.len(), 25);
    let admin = PostgresAdmin::connect(&db.url, "read").await.unwrap();
    let info = admin.projections().await.unwrap().remove(0);
    assert_eq!(
        (info.name.as_str(), info.active_version, info.checkpoint),
        ("user_names", Some(1), 25)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_inline_catches_up_on_events_appended_without_it() {
    let db = factline_testkit::pg::database().await;
    let plain = PostgresStore::connect(&db.url).await.unwrap();
    for i in 0..3 {
        let stream = StreamId::new(format!("User-old{i}")).unwrap();
        plain
            .append(
                &stream,
                ExpectedVersion::NoStream,
                registered(&format!("old-{i}")),
            )
            .await
            .unwrap();
    }
    let store = open_postgres(&db.url).await;
    // Its first append applies the three before it, then its own.
    register(&*store, "User-a", "a").await.unwrap();
    assert_eq!(postgres_names(&db.url).await.len(), 4);
    register(&plain, "User-side", "side").await.unwrap();
    let refused = register(&*store, "User-dup", "side").await;
    assert!(
        matches!(refused, Err(StoreError::InlineRefused { .. })),
        "{refused:?}"
    );
    // The refusal rolled back the gap with it; the next append applies it.
    register(&*store, "User-new", "new").await.unwrap();
    let names = postgres_names(&db.url).await;
    assert_eq!(names.len(), 6);
    assert!(names.contains(&("side".to_owned(), "User-side".to_owned())));
}

/// An inline projection whose database fails on events of type `Broken`:
/// a failure, not a refusal.
struct Failing;

impl Failing {
    fn check(events: &[RecordedEvent]) -> Result<(), factline_core::InlineError> {
        match events.iter().any(|e| e.event_type == "Broken") {
            true => Err(
                factline_core::StorageError::new("the read model's disk is gone")
                    .retryable()
                    .into(),
            ),
            false => Ok(()),
        }
    }
}

impl factline_sqlite::InlineProjection for Failing {
    fn name(&self) -> &str {
        "failing"
    }
    fn checkpoint(
        &mut self,
        _: &rusqlite::Transaction<'_>,
    ) -> Result<u64, factline_core::InlineError> {
        Ok(0)
    }
    fn apply(
        &mut self,
        _: &rusqlite::Transaction<'_>,
        events: &[RecordedEvent],
    ) -> Result<(), factline_core::InlineError> {
        Self::check(events)
    }
}

#[async_trait::async_trait]
impl factline_postgres::InlineProjection for Failing {
    fn name(&self) -> &str {
        "failing"
    }
    async fn checkpoint(
        &mut self,
        _: &tokio_postgres::Client,
    ) -> Result<u64, factline_core::InlineError> {
        Ok(0)
    }
    async fn apply(
        &mut self,
        _: &tokio_postgres::Client,
        events: &[RecordedEvent],
    ) -> Result<(), factline_core::InlineError> {
        Self::check(events)
    }
}

/// A failing database is a storage failure of that append (retryable when
/// the failure is), not the projection refusing it; nothing of it is
/// written and the other appends stand.
async fn a_failing_inline_database_fails_the_append_as_storage(store: Arc<dyn EventStore>) {
    let ok = StreamId::new("Ok-1").unwrap();
    let broken = StreamId::new("Broken-1").unwrap();
    let fine = EventData::new("Fine", json!({}));
    store
        .append(&ok, ExpectedVersion::NoStream, vec![fine])
        .await
        .unwrap();
    let failed = store
        .append(
            &broken,
            ExpectedVersion::NoStream,
            vec![EventData::new("Broken", json!({}))],
        )
        .await;
    match failed {
        Err(StoreError::Storage(e)) => {
            assert!(e.is_retryable(), "{e}");
            assert!(e.to_string().contains("disk is gone"), "{e}");
        }
        other => panic!("a storage failure, not {other:?}"),
    }
    let read = store
        .read_stream(&broken, factline_core::ReadStream::forwards())
        .await
        .unwrap();
    assert!(read.is_empty(), "nothing of it was written");
    let next = EventData::new("Fine", json!({ "n": 2 }));
    store
        .append(&ok, ExpectedVersion::Exact(1), vec![next])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_a_failing_inline_database_fails_the_append_as_storage() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_with_inline(
        SqliteConfig::new(dir.path().join("f.db")),
        vec![Box::new(Failing)],
    )
    .unwrap();
    a_failing_inline_database_fails_the_append_as_storage(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_failing_inline_database_fails_the_append_as_storage() {
    let db = factline_testkit::pg::database().await;
    let store =
        PostgresStore::connect_with_inline(PostgresConfig::new(&db.url), vec![Box::new(Failing)])
            .await
            .unwrap();
    a_failing_inline_database_fails_the_append_as_storage(Arc::new(store)).await;
}
